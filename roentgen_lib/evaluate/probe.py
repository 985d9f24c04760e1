"""The text-encoder probe: how well a linear probe reads each finding from a model's text embeddings."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from roentgen_lib.evaluate.judge import FINDINGS, net_device


@torch.no_grad()
def text_embeddings(text_encoder: nn.Module, tokenizer, prompts: list[str], batch_size: int = 256) -> np.ndarray:
    """Mean text-encoder state over each prompt's tokens (start to end-of-text), one row per prompt."""
    rows = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[start : start + batch_size], padding="max_length", truncation=True,
                           max_length=tokenizer.model_max_length, return_tensors="pt")
        states = text_encoder(tokens.input_ids.to(net_device(text_encoder)))[0].float().cpu()
        mask = tokens.attention_mask.unsqueeze(-1).to(states.dtype)
        rows.append(((states * mask).sum(1) / mask.sum(1)).numpy())
    return np.concatenate(rows)


def probe_table(train_embeddings: np.ndarray, train_truth: pd.DataFrame, test_embeddings: np.ndarray,
                test_truth: pd.DataFrame, seed: int, **keys) -> pd.DataFrame:
    """Linear probe (logistic regression) per finding on text embeddings: AUROC on held-out reports."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rows = []
    for finding in FINDINGS:
        y_train, y_test = train_truth[finding].to_numpy(), test_truth[finding].to_numpy()
        usable = 0 < y_train.sum() < len(y_train) and 0 < y_test.sum() < len(y_test)
        value = float("nan")
        if usable:
            probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
            probe.fit(train_embeddings, y_train)
            value = roc_auc_score(y_test, probe.predict_proba(test_embeddings)[:, 1])
        rows.append({**keys, "finding": finding, "metric": "probe AUROC", "value": round(float(value), 4),
                     "test positives": int(y_test.sum())})
    return pd.DataFrame(rows)
