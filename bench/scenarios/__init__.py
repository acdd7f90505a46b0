"""Benchmark scenarios that live in a module of their own (the older ones are in `bench.run` /
`bench.loadgen`). Each module holds both halves of its scenario: the load-generator side (run inside
`python -m bench.loadgen NAME`) and the coordinator side (called by `bench.run`)."""
