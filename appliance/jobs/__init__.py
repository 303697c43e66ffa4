"""Jobs: every long-running stage (training, QAT, export, engine builds, big imports) runs as a
separate, detached process (`airlock jobs run ID`) that reports progress into the catalog.

States: queued -> running -> succeeded | failed | cancelled; a job whose process vanished
(kill -9, power loss) is found at the next look and marked `interrupted`, and can be resumed.
"""
