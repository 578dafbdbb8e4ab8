"""`odekit certify`: l2 Lipschitz bounds of every layer and of the network, certified radii and
accuracy next to the empirical robustness the attacks measure, for one model or a teacher and
its student."""
