"""Operations: the local stack (``dinoalign infra``), the DVC/MLflow plumbing that moves
the pipeline onto it, and scheduled retraining with champion/candidate promotion
(``dinoalign retrain``). See docs/operations.md."""
