"""The Ray Serve backend: a deployment (one replica per GPU) and the engine client that calls it.

The bot keeps the queue: fairness, per-member caps, positions, cancel-before-start and batch
planning stay in bot.executor, which drives one `bot.executor.Worker` per replica slot. Each
worker's engine is a `client.ServeEngine`, which sends its planned batch to the deployment and
streams the progress back. SDBOT_BACKEND=serve selects it (bot.runner).

- `protocol`: the plain data the bot and a replica exchange (payload, step events, results).
- `replica`: the deployment's class: a `bot.engine.Engine` preloaded in `__init__`, models
  through `@serve.multiplexed`, each call streamed from the engine thread, cancel -> flag.
- `app`: the deployment's options (fixed replicas, `max_ongoing_requests=1`) and the app
  builder `build_app` named by the shipped `serve_config.yaml` for `serve deploy`.
- `client`: `ServeEngine`, a `bot.backend.GenerationEngine` over the deployment's handle:
  explicit cancel, one retry when a replica dies.
- `stream`: reading a replica's streamed reply with a deadline on silence (replicas send
  heartbeats), and Ray's errors as the bot's.
- `cluster`: start-up and tear-down (`serve_engines`): Ray in-process for
  SDBOT_SERVE_ADDRESS=local, else a handle to the app already deployed on the cluster.

Only this package imports Ray (an import-linter contract); nothing here imports discord.
"""
