"""maestro_jax: trainable low-rank layers with ordered dropout (Maestro) in JAX.

The functional core works on plain parameter dicts; ``maestro_jax.nnx`` and
``maestro_jax.linen`` wrap it as Flax layers. Sub-modules: ``samplers``
(keep-count samplers and their registry), ``nnx``, ``linen``, ``training``,
``sweep``, ``export``, ``accounting``, ``models``, ``data``.
"""

from maestro_jax import samplers
# Layers as pure functions on {'a', 'b', 'bias'?} dicts.
from maestro_jax._src.factorized import capacity
from maestro_jax._src.factorized import conv
from maestro_jax._src.factorized import dense
from maestro_jax._src.factorized import dense_kernel
from maestro_jax._src.factorized import dot_product_attention
from maestro_jax._src.factorized import factorize_kernel
from maestro_jax._src.factorized import factorize_matrix
from maestro_jax._src.factorized import init_layer
from maestro_jax._src.factorized import is_merged
from maestro_jax._src.factorized import merge_layer
from maestro_jax._src.factorized import multi_head_attention
from maestro_jax._src.factorized import truncate_layer
# The shared rules and the layer-kind table.
from maestro_jax._src.kinds import KINDS
from maestro_jax._src.kinds import LayerKind
from maestro_jax._src.kinds import kind_of
from maestro_jax._src.kinds import matrix_dims
from maestro_jax._src.rules import fraction_to_rank
from maestro_jax._src.rules import full_rank
from maestro_jax._src.rules import should_merge
# Samplers (the factories themselves are in maestro_jax.samplers).
from maestro_jax.samplers import SAMPLERS
from maestro_jax.samplers import ParamSampler
from maestro_jax.samplers import Sampler
from maestro_jax.samplers import make_sampler
# Group lasso, importance and shrinking.
from maestro_jax._src.regularizers import component_scales
from maestro_jax._src.regularizers import frobenius_decay
from maestro_jax._src.regularizers import group_lasso
from maestro_jax._src.regularizers import importance
from maestro_jax._src.regularizers import layer_group_lasso
from maestro_jax._src.regularizers import layer_importance
from maestro_jax._src.shrink import new_capacities
from maestro_jax._src.shrink import ranks_from_importance
from maestro_jax._src.shrink import round_up_rank
from maestro_jax._src.shrink import shrink
# Finding layers in parameter trees.
from maestro_jax._src.tree import capacities
from maestro_jax._src.tree import factorized_layers
from maestro_jax._src.tree import is_factorized
from maestro_jax._src.tree import map_layers
# Dense -> factorized conversion (Pufferfish, post-hoc truncated SVD).
from maestro_jax._src.baselines import factorize_dense_params
from maestro_jax._src.baselines import truncate_dense_params
from maestro_jax._src.convert import dense_layers as dense_layer_names
# Singular values; Decomposable-Net; spectral init.
from maestro_jax._src.decomposable import decomposable_sampler
from maestro_jax._src.decomposable import global_budget_keeps
from maestro_jax._src.spectrum import factor_svd
from maestro_jax._src.spectrum import layer_singular_values
from maestro_jax._src.spectrum import singular_values
from maestro_jax._src.spectrum import spectral_init
from maestro_jax._src.spectrum import svd_reorthogonalize
# Factor freezing.
from maestro_jax._src.freezing import freeze_mask
from maestro_jax._src.freezing import frozen_optimizer
from maestro_jax._src.freezing import refreeze_state
from maestro_jax._src.freezing import sequential_freeze_schedule
from maestro_jax._src.freezing import stop_frozen_gradients

__version__ = "0.1.0"

__all__ = [
    "samplers",
    "capacity", "conv", "dense", "dense_kernel", "dot_product_attention", "factorize_kernel", "factorize_matrix",
    "init_layer", "is_merged", "merge_layer", "multi_head_attention", "truncate_layer",
    "KINDS", "LayerKind", "kind_of", "matrix_dims", "fraction_to_rank", "full_rank", "should_merge",
    "SAMPLERS", "ParamSampler", "Sampler", "make_sampler",
    "component_scales", "frobenius_decay", "group_lasso", "importance", "layer_group_lasso", "layer_importance",
    "new_capacities", "ranks_from_importance", "round_up_rank", "shrink",
    "capacities", "factorized_layers", "is_factorized", "map_layers",
    "factorize_dense_params", "truncate_dense_params", "dense_layer_names",
    "decomposable_sampler", "global_budget_keeps", "factor_svd", "layer_singular_values", "singular_values",
    "spectral_init", "svd_reorthogonalize",
    "freeze_mask", "frozen_optimizer", "refreeze_state", "sequential_freeze_schedule", "stop_frozen_gradients",
]
