"""Backbone inputs for tests: int32 `token_ids` and a `padding_mask` (all ones by default)."""

import numpy as np


def glam_inputs(token_ids, padding_mask=None):
    token_ids = np.asarray(token_ids, "int32")
    if padding_mask is None:
        padding_mask = np.ones_like(token_ids)
    return {"token_ids": token_ids, "padding_mask": np.asarray(padding_mask, "int32")}
