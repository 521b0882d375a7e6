"""The WEARec repository's own trained checkpoints (../shared/reference/wearec), loaded into athwe's
WEARec, give the test rows its logs print: a guard on WEARec's forward pass, the data readers, the
bsarec split and the evaluator through any refactoring."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from athwe.config import resolve_config
from athwe.evaluation.metrics import evaluate
from athwe.models import create_model
from athwe.runs import load_data

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "wearec"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# file, dataset, N, alpha, heads; HR@5, NDCG@5, HR@10, NDCG@10, HR@20, NDCG@20 (../shared/reference/README.md)
ROWS = [
    ("WEARec_K_50_LastFM_0.5_0.001_0.3_2.pt", "LastFM", 50, 0.3, 2, (.0505, .0341, .0899, .0465, .1202, .0543)),
    ("WEFTRec_K_200_LastFM_0.5_0.001_0.1_2.pt", "LastFM", 200, 0.1, 2, (.0661, .0456, .0972, .0556, .1477, .0682)),
    ("WEARec_K_50_Beauty_0.5_0.0005_0.2_8.pt", "Beauty", 50, 0.2, 8, (.0738, .0516, .1041, .0614, .1391, .0703)),
]
METRICS = ("HR@5", "NDCG@5", "HR@10", "NDCG@10", "HR@20", "NDCG@20")


def from_reference(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference code's parameter names mapped to athwe's WEARec (its unused gate_param dropped;
    its complex_weight is the wavelet detail scale T)."""
    names = {"item_embeddings": "embedding.item", "position_embeddings": "embedding.position",
             "LayerNorm": "embedding.norm"}
    out = {}
    for key, value in state.items():
        if key.endswith("gate_param"):
            continue
        head, _, rest = key.partition(".")
        if head in names:
            out[f"{names[head]}.{rest}"] = value
            continue
        key = key.removeprefix("item_encoder.").replace("LayerNorm", "norm")
        key = key.replace("base_filter", "filter_base").replace("base_bias", "bias_base")
        out[key.replace("complex_weight", "detail_scale")] = value
    return out


@pytest.mark.slow
@pytest.mark.skipif(not REFERENCE.is_dir() or not DATA.is_dir(), reason="needs ../shared/reference and ../shared/data")
@pytest.mark.parametrize("file,dataset,n,alpha,heads,row", ROWS, ids=[r[0] for r in ROWS])
def test_reference_checkpoint_gives_its_published_test_row(file, dataset, n, alpha, heads, row):
    cfg = resolve_config("wearec", dataset, overrides=[f"model_args.alpha={alpha}", f"model_args.num_heads={heads}"],
                         flags={"data.data_dir": str(DATA), "data.max_seq_length": n})
    assert cfg.data.preset == "bsarec"
    data, split = load_data(cfg)
    model = create_model("wearec", data.n_items, n, cfg.model_args)
    model.load_state_dict(from_reference(torch.load(REFERENCE / file, map_location="cpu", weights_only=True)))
    model.eval()
    metrics, _ = evaluate(model.scores, split.test, "zero", 512, torch.device("cpu"), trim=model.supports_trimming)
    assert [round(metrics[m], 4) for m in METRICS] == list(row)
