"""Built-in tools, one module each; every module exports `TOOL` (a `registry.Tool`).

`flaky` and `send_email` are test tools: registered only with `TIDEWIRE_TEST_TOOLS=1`.
"""
