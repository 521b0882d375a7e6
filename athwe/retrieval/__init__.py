"""FAISS inner-product indexes over a trained model's item vectors, top-k retrieval for any history,
and new items from their content."""
from athwe.retrieval.index import (INDEX_KINDS, Recommendation, Request, Retriever, add_to_index, build_index,
                                   build_run_index, load_run_index, write_run_index)
from athwe.retrieval.new_items import NewItem, read_new_items

__all__ = ["INDEX_KINDS", "NewItem", "Recommendation", "Request", "Retriever", "add_to_index", "build_index",
           "build_run_index", "load_run_index", "read_new_items", "write_run_index"]
