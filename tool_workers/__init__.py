"""Tool workers: run the model's tool calls off the turn loop, from JetStream work queues.

`python -m tool_workers` starts one worker; `tool_workers.registry` describes the tools (shared
with the orchestrator's dispatcher); `tool_workers.service` is the worker itself.
"""
