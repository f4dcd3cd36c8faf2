"""Feature-field selection for pre-ranking: FSCD and its two baselines, with one scikit-learn-like interface.

``Selector(k=K, ...).fit(dataset_dir_or_batches)`` returns the selector with ``importances_``,
``ranking_`` (1 = best) and ``selected_features_`` (the top ``K`` fields) set.
"""

from prerank.selection.base import FieldSelector
from prerank.selection.dfs import DFS
from prerank.selection.dropout_fr import DropoutFR
from prerank.selection.fscd import FSCD, cost_table, finetune_state

#: ``prerank select --method NAME``
SELECTORS: dict[str, type[FieldSelector]] = {"fscd": FSCD, "dropout_fr": DropoutFR, "dfs": DFS}

__all__ = ["DFS", "FSCD", "SELECTORS", "DropoutFR", "FieldSelector", "cost_table", "finetune_state"]
