"""Defences against adversarial examples, each measured against an attack that knows it.

- `distillation`: defensive distillation (Papernot et al. 2016): a teacher and a student
  trained with the softmax at temperature T, deployed at T = 1; the adaptive attack works on
  logits / T (Carlini & Wagner 2016), not on the saturated softmax.
- `adversarial`: adversarial training (Madry et al. 2018): PGD L-inf examples in every
  training batch through `vae_attacks.train`'s `perturb` hook (FGSM with a random start,
  Wong et al. 2020, is PGD with one step); and `attack_with_restarts`, the worst case of an
  untargeted attack over random restarts, the robust-accuracy measure.
- `transfer`: black-box transfer: adversarial examples crafted on each model and evaluated
  on every other, a source x target matrix whose diagonal is the white-box result.
- `gmvae`: a Gaussian-mixture VAE classifier with rejection thresholds (Ghosh et al. 2018)
  and an attack that also keeps the input inside them.
- `projection`: projection onto the VAE decoder's range (Defense-GAN, Samangouei et al.
  2018), attacked with BPDA (Athalye et al. 2018).
- `siamese`: a siamese embedding network identifying faces by their nearest class centre.

Like the attacks, defences see models only as pure functions `fn(params, x) -> logits`; the
library does no I/O except through `vae_attacks.train`'s optional checkpoints.
"""
