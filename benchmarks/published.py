"""Published full-ranking numbers (specs/published-results.md) that the reproduction tables cite,
keyed by (dataset, model); each table holds figures for one sequence length N."""

# WEARec paper Table 1 (BSARec code base, bsarec preset, N=50); @5 rows from the BSARec paper / WEARec logs.
PUBLISHED = {
    ("LastFM", "sasrec"): {"HR@10": .0633, "HR@20": .0927, "NDCG@10": .0355, "NDCG@20": .0429},
    # the FEARec rows come from the BSARec code's FEARec port (model_args.variant=bsarec)
    ("LastFM", "fearec"): [({"variant": "bsarec"},
                            {"HR@10": .0587, "HR@20": .0826, "NDCG@10": .0354, "NDCG@20": .0414})],
    ("LastFM", "bsarec"): {"HR@5": .0523, "HR@10": .0807, "HR@20": .1174,
                           "NDCG@5": .0344, "NDCG@10": .0435, "NDCG@20": .0526},
    ("LastFM", "wearec"): {"HR@5": .0505, "HR@10": .0899, "HR@20": .1202,
                           "NDCG@5": .0341, "NDCG@10": .0465, "NDCG@20": .0543},
    ("Beauty", "sasrec"): {"HR@10": .0531, "HR@20": .0823, "NDCG@10": .0283, "NDCG@20": .0356},
    ("Beauty", "fearec"): [({"variant": "bsarec"},
                            {"HR@10": .0982, "HR@20": .1352, "NDCG@10": .0601, "NDCG@20": .0694})],
    ("Beauty", "bsarec"): {"HR@5": .0736, "HR@10": .1008, "HR@20": .1373,
                           "NDCG@5": .0523, "NDCG@10": .0611, "NDCG@20": .0703},
    ("Beauty", "wearec"): {"HR@5": .0738, "HR@10": .1041, "HR@20": .1391,
                           "NDCG@5": .0516, "NDCG@10": .0614, "NDCG@20": .0703},
}
# The reference code run on this machine (CPU), LastFM, README settings, seed 42.
REFERENCE_HERE = {
    ("LastFM", "wearec"): {"HR@5": .0477, "HR@10": .0688, "HR@20": .1128,
                           "NDCG@5": .0322, "NDCG@10": .0391, "NDCG@20": .0501},
    ("LastFM", "bsarec"): {"HR@5": .0468, "HR@10": .0661, "HR@20": .1055,
                           "NDCG@5": .0345, "NDCG@10": .0408, "NDCG@20": .0507},
}
# WEARec README, long-sequence update (N=200), LastFM: the entry of the reference repository's
# N=200 results log (src/results_log/result_200_all.txt) for dropout 0.5, lr 1e-3, alpha 0.1,
# 2 heads; the same log's entry at the N=50 published setting (alpha 0.3, 2 heads) is kept beside
# it. Each row records the model settings it was obtained with: a run is compared (as a ratio)
# only with the row whose settings it shares.
PUBLISHED_N200 = {
    ("LastFM", "wearec"): [
        ({"alpha": 0.1, "num_heads": 2},
         {"HR@5": .0661, "HR@10": .0972, "HR@20": .1477, "NDCG@5": .0456, "NDCG@10": .0556, "NDCG@20": .0682}),
    ],
}
REFERENCE_LOG_N200 = {
    ("LastFM", "wearec"): [
        ({"alpha": 0.3, "num_heads": 2},
         {"HR@5": .0679, "HR@10": .0954, "HR@20": .1459, "NDCG@5": .0440, "NDCG@10": .0529, "NDCG@20": .0655}),
    ],
}


# What a comparison row is, printed under a table that shows it.
ROW_NOTES = {
    "published, N=200": "Published N=200 row: the WEARec README's long-sequence figures, which are the entry of "
                        "the reference repository's N=200 results log (src/results_log/result_200_all.txt) for "
                        "dropout 0.5, lr 1e-3 and the settings named in the row.",
    "reference log, N=200": "Reference log row: the same results log's test figures at the settings named in the "
                            "row (dropout 0.5, lr 1e-3), one run each; a ratio is taken only against the row whose "
                            "settings the runs share.",
}

# The loss the published rows were trained with where it is not CE: the paper's SASRec baseline
# used BCE with one sampled negative (specs/published-results.md).
PUBLISHED_LOSS = {"sasrec": "bce"}


def _settings_label(settings: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in settings.items())


def comparisons(dataset: str, model: str, max_seq_length: int, loss: str = "ce",
                model_args: dict | None = None) -> list[tuple[str, dict[str, float], bool]]:
    """(label, figures, comparable) of the published and reference rows measured at this sequence
    length. `comparable` is False when a row was trained with another loss than `loss`, or (rows
    that record their model settings) with other settings than `model_args`: the row is shown,
    labelled with its loss or settings, but no ratio is taken."""
    tables = {50: [("published", PUBLISHED), ("reference code here", REFERENCE_HERE)],
              200: [("published, N=200", PUBLISHED_N200), ("reference log, N=200", REFERENCE_LOG_N200)]
              }.get(max_seq_length, [])
    theirs = PUBLISHED_LOSS.get(model, "ce")
    args = model_args or {}
    out = []
    for label, table in tables:
        entry = table.get((dataset, model))
        if entry is None:
            continue
        for settings, figures in (entry if isinstance(entry, list) else [({}, entry)]):
            same = theirs == loss and all(args.get(k) == v for k, v in settings.items())
            name = label + (f"; {_settings_label(settings)}" if settings else "")
            out.append((name if theirs == loss else f"{name}, trained with {theirs.upper()}", figures, same))
    return out
