"""AutoGLM Studio: the Gradio UI at / and the OpenAI-compatible API at /v1, on one port.

    python app.py                      # the shipped demo model, http://127.0.0.1:8000
    python app.py --model DIR_OR_HUB_ID --quantize int4 --gpus 0,1 --gpu-memory 24GiB
    python app.py --plan --gpus 0,1 --gpu-memory 24GiB --quantize int4 \
        --model-config assets/configs/autoglm-phone-9b.json

The same as the ``autoglm-studio`` command that ``pip install .`` installs (``autoglm_app.cli``).
"""

import sys

from autoglm_app.cli import main

if __name__ == "__main__":
    sys.exit(main())
