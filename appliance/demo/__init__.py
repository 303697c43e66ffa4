"""`airlock demo`: the whole story, offline, on a laptop-class machine.

    cli.py             the `airlock demo` command: full story, or --skip-bundle for stages 3-6
    bundle.py          stages 1-2: build a signed bundle, install it with no network
    story.py           stages 3-6: vault, imports, training, optimize, promote, serve, retrain, audit
    steps.py           running CLI commands, timing stages, the summary table
    client.py          the HTTP client a site's application would be (urllib only)
    netns.py           loopback up inside `unshare -n`
    text_samples.py    the shipped text datasets (data/*.jsonl) and their generator
    dicom_phantoms.py  synthetic DICOM phantoms with fake PHI
"""
