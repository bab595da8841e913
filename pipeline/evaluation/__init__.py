"""Evaluation: classification, calibration, FGSM/PGD, OOD and CUB WSOL (docs/evaluation.md).

Modules: metrics (torchmetrics-backed scores), attacks (FGSM/PGD on [0, 1] pixels), boxes and
wsol (CAMs and wsolevaluation's box scores), cub_data / cub_synth (CUB-format data), ood_data
(OOD image folders), run (the suites), report (MLflow and tables), cli (the commands).
"""
