"""FAISS inner-product indexes over a trained model's item vectors, and top-k retrieval."""
from athwe.retrieval.index import (INDEX_KINDS, Retriever, build_index, build_run_index, load_run_index,
                                   write_run_index)

__all__ = ["INDEX_KINDS", "Retriever", "build_index", "build_run_index", "load_run_index", "write_run_index"]
