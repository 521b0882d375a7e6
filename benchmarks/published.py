"""Published full-ranking numbers (specs/published-results.md) that the reproduction tables cite,
keyed by (dataset, model); each table holds figures for one sequence length N."""

# WEARec paper Table 1 (BSARec code base, bsarec preset, N=50); @5 rows from the BSARec paper / WEARec logs.
PUBLISHED = {
    ("LastFM", "sasrec"): {"HR@10": .0633, "HR@20": .0927, "NDCG@10": .0355, "NDCG@20": .0429},
    ("LastFM", "fearec"): {"HR@10": .0587, "HR@20": .0826, "NDCG@10": .0354, "NDCG@20": .0414},
    ("LastFM", "bsarec"): {"HR@5": .0523, "HR@10": .0807, "HR@20": .1174, "NDCG@5": .0344, "NDCG@10": .0435, "NDCG@20": .0526},
    ("LastFM", "wearec"): {"HR@5": .0505, "HR@10": .0899, "HR@20": .1202, "NDCG@5": .0341, "NDCG@10": .0465, "NDCG@20": .0543},
    ("Beauty", "sasrec"): {"HR@10": .0531, "HR@20": .0823, "NDCG@10": .0283, "NDCG@20": .0356},
    ("Beauty", "fearec"): {"HR@10": .0982, "HR@20": .1352, "NDCG@10": .0601, "NDCG@20": .0694},
    ("Beauty", "bsarec"): {"HR@5": .0736, "HR@10": .1008, "HR@20": .1373, "NDCG@5": .0523, "NDCG@10": .0611, "NDCG@20": .0703},
    ("Beauty", "wearec"): {"HR@5": .0738, "HR@10": .1041, "HR@20": .1391, "NDCG@5": .0516, "NDCG@10": .0614, "NDCG@20": .0703},
}
# The reference code run on this machine (CPU), LastFM, README settings, seed 42.
REFERENCE_HERE = {
    ("LastFM", "wearec"): {"HR@5": .0477, "HR@10": .0688, "HR@20": .1128, "NDCG@5": .0322, "NDCG@10": .0391, "NDCG@20": .0501},
    ("LastFM", "bsarec"): {"HR@5": .0468, "HR@10": .0661, "HR@20": .1055, "NDCG@5": .0345, "NDCG@10": .0408, "NDCG@20": .0507},
}
# WEARec README, long-sequence update (N=200), LastFM.
PUBLISHED_N200 = {
    ("LastFM", "wearec"): {"HR@5": .0661, "HR@10": .0972, "HR@20": .1477, "NDCG@5": .0456, "NDCG@10": .0556, "NDCG@20": .0682},
}


# The loss the published rows were trained with where it is not CE: the paper's SASRec baseline
# used BCE with one sampled negative (specs/published-results.md).
PUBLISHED_LOSS = {"sasrec": "bce"}


def comparisons(dataset: str, model: str, max_seq_length: int,
                loss: str = "ce") -> list[tuple[str, dict[str, float], bool]]:
    """(label, figures, comparable) of the published and reference-code rows measured at this
    sequence length; `comparable` is False when they were trained with another loss than `loss`
    (the row is shown, labelled with its loss, but no ratio is taken)."""
    tables = {50: [("published", PUBLISHED), ("reference code here", REFERENCE_HERE)],
              200: [("published, N=200", PUBLISHED_N200)]}.get(max_seq_length, [])
    theirs = PUBLISHED_LOSS.get(model, "ce")
    out = []
    for label, table in tables:
        if (dataset, model) in table:
            same = theirs == loss
            out.append((label if same else f"{label}, trained with {theirs.upper()}", table[(dataset, model)], same))
    return out
