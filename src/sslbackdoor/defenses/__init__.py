"""Defenses against backdoored encoders, evaluated as the BadEncoder paper does (Section VI).

* `inversion`: the one trigger-inversion loop Neural Cleanse and DECREE share;
* `neural_cleanse`: per-label inversion on a classifier, MAD anomaly index, unlearning;
* `decree`: label-free inversion on an encoder (`sslbackdoor scan`);
* `mntd`: meta-classifier with learnable queries over shadow encoders (`shadow`);
* `patchguard`: robust masking of local encoder features, certification;
* `experiment`: the `defenses` experiment kind; `cli`: `sslbackdoor defend …` and `scan`.
"""
