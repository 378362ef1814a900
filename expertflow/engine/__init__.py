"""The engine: one step loop for every front end (paper Fig. 1).

- `loop`: `StepLoop.step()`: predict and schedule (on a worker), plan and prefetch, run, sample and admit;
- `steps`: the step's operations (`BatchRunner`) and `generate` (a prompt list as one static batch);
- `runner` / `seq2seq_runner`: how a decoder-only or an encoder-decoder model is called (chosen by the adapter);
- `sequence`: sequences, batches and the loop's settings; `sampling`: tokens and the checks before them;
- `kv`: KV caches that follow their sequences; `routing`: the routing each forward executed.

Modules are imported by their full path; this package's import runs nothing.
"""
