"""maestro_jax: trainable low-rank layers with ordered dropout (Maestro) in JAX.

The functional core works on plain parameter dicts; ``maestro_jax.nnx`` and
``maestro_jax.linen`` wrap it as Flax layers.
"""

from maestro_jax._src.factorized import capacity
from maestro_jax._src.factorized import conv
from maestro_jax._src.factorized import dense
from maestro_jax._src.factorized import dense_kernel
from maestro_jax._src.factorized import dot_product_attention
from maestro_jax._src.factorized import factorize_kernel
from maestro_jax._src.factorized import factorize_matrix
from maestro_jax._src.factorized import full_rank
from maestro_jax._src.factorized import init
from maestro_jax._src.factorized import is_merged
from maestro_jax._src.factorized import merge
from maestro_jax._src.factorized import multi_head_attention
from maestro_jax._src.factorized import truncate
from maestro_jax._src.methods import decomposable_sampler
from maestro_jax._src.methods import dense_layers
from maestro_jax._src.methods import factor_svd
from maestro_jax._src.methods import factorize_dense_params
from maestro_jax._src.methods import freeze_mask
from maestro_jax._src.methods import frozen_optimizer
from maestro_jax._src.methods import global_budget_keeps
from maestro_jax._src.methods import layer_singular_values
from maestro_jax._src.methods import refreeze_state
from maestro_jax._src.methods import sequential_freeze_schedule
from maestro_jax._src.methods import singular_values
from maestro_jax._src.methods import spectral_init
from maestro_jax._src.methods import stop_frozen_gradients
from maestro_jax._src.methods import svd_reorthogonalize
from maestro_jax._src.methods import truncate_dense_params
from maestro_jax._src.regularizers import component_scales
from maestro_jax._src.regularizers import frobenius_decay
from maestro_jax._src.regularizers import group_lasso
from maestro_jax._src.regularizers import importance
from maestro_jax._src.regularizers import layer_group_lasso
from maestro_jax._src.regularizers import layer_importance
from maestro_jax._src.sampling import SAMPLERS
from maestro_jax._src.sampling import fixed_fraction
from maestro_jax._src.sampling import independent
from maestro_jax._src.sampling import make_sampler
from maestro_jax._src.sampling import none
from maestro_jax._src.sampling import Sampler
from maestro_jax._src.sampling import shared_fraction
from maestro_jax._src.sampling import single_layer
from maestro_jax._src.shrink import new_capacities
from maestro_jax._src.shrink import ranks_from_importance
from maestro_jax._src.shrink import round_up
from maestro_jax._src.shrink import shrink
from maestro_jax._src.tree import capacities
from maestro_jax._src.tree import factorized_layers
from maestro_jax._src.tree import is_factorized
from maestro_jax._src.tree import map_layers

__version__ = "0.1.0"
