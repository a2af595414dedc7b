"""dinoalign: text interfaces for DINOv2 (talk2dino, dinotxt, projector) as a DVC + Ray + MLflow pipeline."""

import os as _os

# Under `uv run`, Ray (>= 2.47) starts every worker with `uv run` inside a packaged copy of
# the working directory, i.e. builds a new virtualenv per worker: on a clean machine the
# workers time out ("Failed to startup worker"). Workers must use the driver's interpreter.
# Ray reads this when it is first imported, so it is set here, before any `import ray`.
_os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
