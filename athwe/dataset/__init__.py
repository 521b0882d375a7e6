"""Data layer: readers, item maps, chronological sequences, leave-one-out splits, the demo."""
from athwe.dataset.sequences import SequenceData, load_sequences
from athwe.dataset.split import Batch, SampleSet, Split, build_split

__all__ = ["Batch", "SampleSet", "SequenceData", "Split", "build_split", "load_sequences"]
