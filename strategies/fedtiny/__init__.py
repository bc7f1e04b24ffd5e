"""FedTiny (Huang et al., ICDCS 2023): federated pruning to a tiny sparse model.

Server (:class:`FedTiny`):

1. Sparse start. Layer densities by Erdos-Renyi-Kernel (``layer_densities: erk``; or
   ``uniform``), magnitude pruning of the initial model. Only conv / linear weights are
   pruned; biases and normalization tensors stay dense.
2. Adaptive BN selection (``bn_selection``). In round 1 the server builds ``num_candidates``
   coarse-pruned candidates: candidate 0 uses the ERK densities, candidate j > 0 the ERK
   densities times seeded log-normal factors (``candidate_jitter``), rescaled to the same
   overall density (candidate construction beyond different seeds is **unconfirmed** in
   the paper). The clients sampled for round 1 (a) re-estimate every candidate's BN
   statistics with forward passes only and send them; (b) the server averages them by
   sample count and sends them back; the clients report each candidate's training loss
   under the averaged statistics; (c) the server keeps the candidate with the lowest
   sample-weighted loss, with its averaged BN statistics. Both steps are evaluate-type
   messages carrying ``fedsim.task`` (``fedtiny.bnstats``, ``fedtiny.loss``), sent by the
   strategy itself inside round 1's ``configure_train``; their bytes count in round 1.
3. Progressive prune-and-grow (``progressive``). In every round t with t % delta_t == 0
   and t < t_end, each layer updates ``k = floor(alpha/2 * (1 + cos(pi t / t_end)) *
   active)`` weights: clients accumulate the gradients of the layer's inactive weights over
   their local steps, keeping only the top-k entries (bounded memory) and send them (values
   + indices); after averaging the weights, the server drops the k active weights of
   smallest magnitude and grows the k inactive ones with the largest averaged gradient
   (initialised to 0). Density stays constant. Between these steps masks never change.

Masks are enforced on the client (gradients of pruned weights zeroed before the step,
weights re-masked after it), in aggregation (mean over the mask, re-masked) and on the
wire: a masked tensor travels as ``key::v`` (float32 values) + ``key::i`` (flat indices,
uint8/16/32), both directions (``uplink_indices: false`` drops the redundant uplink
indices: the server knows the mask). fedsim's byte counter therefore counts exactly that.

Per-round metrics (``strategy_metrics`` in metrics.jsonl): ``density`` (active fraction of
prunable weights), ``density_all`` (of all parameters), ``flops_dense`` / ``flops_sparse``
(one forward pass of one sample, 2 * MACs of conv and linear layers), ``mem_dense_bytes`` /
``mem_sparse_bytes`` (model tensors; sparse = values + indices + dense tensors),
``bytes_down_dense_equiv`` / ``bytes_up_dense_equiv`` (what dense float32 models would
have cost this round; ``*_total``: over all rounds so far), ``mask_changed`` (weights
regrown this round) and, every round, the round-1 selection: ``selected_candidate``,
``candidate_loss.<j>``, ``selection_bytes_down/up``.

Package: :mod:`.sparsity` (ERK densities, masks, the values+indices wire format, FLOPs and
memory accounting), :mod:`.client` (:class:`SparseClient`), :mod:`.server` (:class:`FedTiny`).
"""

from fedsim.strategies.fedtiny.client import GIDX, GROW_KEY, GVAL, SparseClient
from fedsim.strategies.fedtiny.server import FedTiny

__all__ = ["GIDX", "GROW_KEY", "GVAL", "FedTiny", "SparseClient"]
