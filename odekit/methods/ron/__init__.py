"""RON: reduced-order networks (thesis ch. 5, Algorithm 1, eq. 5.14-5.20).

A pretrained teacher is traced with ``torch.fx``. For a range of compute layers A..B the part
of the graph from the input of layer A to the end of layer B's block (its BatchNorm,
element-wise monotone activation, max-pool and residual sum) is replaced by a small dense
network that propagates *sampled* activations:

* every activation output ("state") z_k gets a basis V_k (D_k x R_k) from a streaming
  frequent-directions SVD of its outputs over the training samples (never N x D in memory);
* rectangular maxvol picks P_k rows S_k of V_k;
* the pre-activation of state k is an affine function of earlier states (or of the region's
  input x): a_k = sum_j L_kj z_j + b_k (conv/linear, BatchNorm, flatten, pooling-free
  shortcuts, residual sums: eq. 5.16). The student computes
  s_k = psi_k( sum_j S_k L_kj V_j (S_j V_j)^+ s_j + S_k b_k )   (eq. 5.14),
  with W~_0 = S_1 L_1 for the region input (rows of the conv map obtained by a vector-Jacobian
  product, never a dense conv matrix) and L_kj applied to the R_j basis columns reshaped as
  feature maps. BatchNorm (eval mode) is part of the affine map, i.e. folded.
* a max-pooled state samples the k x k inputs of each chosen pooled output and takes the max
  after the activation (monotone activations commute with max);
* the output map V_K (S_K V_K)^+ restores the full activation, which feeds the unchanged rest
  of the teacher.

The student is an ordinary ``nn.Module`` registered as architecture ``ron_student``: its JSON
args (teacher arch/args, cut points, stage sizes) rebuild it, so ``load_model`` reads it back.
"""

from odekit.methods.ron.build import build_student
from odekit.methods.ron.compress import RonRun, reduce_teacher
from odekit.methods.ron.linear_maps import conv_rows, fold_batchnorm
from odekit.methods.ron.regions import analyse_region
from odekit.methods.ron.settings import RonLayerReport, RonResult, RonSettings
from odekit.models.ron_student import RON_ARCH, RONStudent, activation_from_config, trace_model

__all__ = [
    "RON_ARCH",
    "RONStudent",
    "RonLayerReport",
    "RonResult",
    "RonRun",
    "RonSettings",
    "activation_from_config",
    "analyse_region",
    "build_student",
    "conv_rows",
    "fold_batchnorm",
    "reduce_teacher",
    "trace_model",
]
