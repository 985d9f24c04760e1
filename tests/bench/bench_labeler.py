"""Benchmark: rule-labeler throughput on 100,000 reports on one core (target: under 60 s).

    make bench            # or: .venv/bin/python tests/bench/bench_labeler.py

The IU-Xray reports (FINDINGS + IMPRESSION) are cycled to 100,000; one process, one thread.
Prints reports/s and the projected time for 100k reports. A benchmark, not a test: no assertion.
"""

import itertools
import time

from roentgen_lib.text.labels import label_report
from roentgen_lib.text.reports import read_iu_reports

N_REPORTS = 100_000


def main() -> None:
    texts = [r.full_text for r in read_iu_reports() if r.full_text]
    start = time.perf_counter()
    for text in itertools.islice(itertools.cycle(texts), N_REPORTS):
        label_report(text)
    seconds = time.perf_counter() - start
    print(f"labelled {N_REPORTS:,} reports in {seconds:.1f} s ({N_REPORTS / seconds:,.0f} reports/s); target < 60 s")


if __name__ == "__main__":
    main()
