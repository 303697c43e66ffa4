"""The model registry: versions with lineage, gated incremental retraining, promotion and schedules.

    versions     ModelVersion rows and tasks; `production(db, task)` is what the server serves
    promotion    promote / rollback / delete, each one audited catalog transaction
    gates        which records a retrain reads (new + seeded replay) and whether it may replace production
    retrain      job kind `retrain`: continue from the production adapter, evaluate the gates, register
    retrain_classifier   the same job for image classifiers (gated on ROC AUC and accuracy)
    engine_gate  gate 3: the optimize stage on the candidate, ONNX Runtime parity (and a TensorRT engine on a GPU)
    card         the model card (Markdown, or HTML with every value escaped) and `models diff`
    cron, schedule, inbox   `airlock schedule`: when to retrain, and files dropped into a folder

Metadata only: record contents never reach these tables, the audit log or a model card.
"""
