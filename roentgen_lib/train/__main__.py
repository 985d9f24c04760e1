"""`python -m roentgen_lib.train --profile tiny -p method=lora` (also under `accelerate launch`)."""

from roentgen_lib.train.loop import main

raise SystemExit(main())
