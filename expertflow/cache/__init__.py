"""The expert cache engine (paper section 3.4): everything between a routed expert and its weights in fast memory.

- `offloaded_experts`: the module that replaces a transformers MoE block's `experts` and asks the cache for each
  routed expert;
- `expert_cache`: the fast-tier slots and their bytes; `residency`: which expert sits in which slot, and the
  counters (pure Python, shared with the simulator);
- `policies/`: eviction and prefetch decisions over (layer, expert) keys, by name; `planner`: turns a policy's
  plan and the routing as it happens into transfers (prefetch, use-ahead, and the run-time correction);
- `transfers`: the worker that runs every transfer; `timing`: the transfer clock and the read meter;
- `stores`: the slow tier (host RAM or the safetensors files), `direct_io`: reads that bypass the page cache.

Modules are imported by their full path; this package's import runs nothing.
"""
