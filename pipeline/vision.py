"""Vision stage (`vision_workers: N`): the vision tower and projector in their own actor pool.

Each `ok` row's prepared input leaves with its image placeholder rows (`image_rows`, float32: exact for
float32 and bfloat16 models) in place of its tiles; the model stage's engine takes the rows as given
(model/engine.py `image_rows`), so the decoder actors never run the vision tower and the rows are the
same as with the vision tower colocated.
"""
from __future__ import annotations

import numpy as np
import torch

from connectors.redact import redact
from pipeline.config import JobConfig
from pipeline.generate import pick_device, pick_dtype
from pipeline.preprocess import pack_arrays, unpack_arrays


class EncodeImages:
    """Ray Data class UDF: a batch of prepared inputs -> the same with image rows instead of tiles."""

    def __init__(self, config: JobConfig, model_path: str) -> None:
        from model import load_pretrained

        device = pick_device(config.device)
        if device.type == "cpu":
            torch.set_num_threads(config.model_threads or max(1, int(config.cpus_per_model_worker)))
        # the whole checkpoint is loaded, the decoder unused (a vision-only loader is not written yet)
        self.model, self.processor = load_pretrained(model_path, device=str(device), dtype=pick_dtype(config.dtype, device))

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from model.engine import image_rows

        status = batch["status"].astype(object).copy()
        error = batch["error"].astype(object).copy()
        prep = batch["prep"].astype(object).copy()
        todo = [i for i in range(len(prep)) if status[i] == "ok"]
        arrays = {i: unpack_arrays(prep[i]) for i in todo}
        try:
            rows = dict(zip(todo, image_rows(self.model, [self.processor.unpack(arrays[i], pixels=True) for i in todo],
                                             self.processor)))
        except Exception:  # noqa: BLE001 - find the item(s) at fault one by one
            rows = {}
            for i in todo:
                try:
                    rows[i] = image_rows(self.model, [self.processor.unpack(arrays[i], pixels=True)], self.processor)[0]
                except Exception as e:  # noqa: BLE001 - one bad item is one error row
                    rows[i] = e
        for i in todo:
            r = rows[i]
            if isinstance(r, Exception):
                status[i] = "error"
                error[i] = redact(f"{batch['source'][i]}: image encoding failed: {type(r).__name__}: {r}")
                continue
            a = arrays[i]
            tiles = a.pop("images_u8", None)
            tiles = a.pop("images", tiles)
            a["images"] = np.zeros((0, *tiles.shape[1:]), dtype=np.float32)  # spent: do not ship them on
            if r is not None:
                a["image_rows"] = r.float().cpu().numpy()
            prep[i] = pack_arrays(a)
        return {**batch, "status": status, "error": error, "prep": prep}
