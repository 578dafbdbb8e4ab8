"""Variable projection (VarPro) training of separable networks x = W F(y, theta) + b.

inner: W(theta) for least squares (SVD/Tikhonov) and cross-entropy (Newton-Krylov trust
region); krylov: CG and Steihaug-CG; separable: splitting a model at its last nn.Linear;
gnvpro: Gauss-Newton-Krylov trust region on the reduced objective (subspace: the paper's
Arnoldi step with the exact subspace trust-region solve); lbfgs: L-BFGS on the reduced
objective; diagnosis: is Gauss-Newton a good model here; slimtrain: mini-batch
sampled-Tikhonov W updates with GCV; first_order: Adam/SGD baselines; training: the driver
(work units, history, multilevel) that `odekit train-ode` calls.
"""
