"""Framework adapters: a Lightning ``Callback`` and a Hugging Face ``TrainerCallback``.

Each is a thin shell around :class:`gradflow.Recorder`: it attaches when training starts, closes
epochs with the framework's logged losses and closes when training ends. Import them from their
modules (``gradflow.integrations.lightning``, ``gradflow.integrations.transformers``); each needs
its framework installed (``pip install 'gradflow[lightning]'`` / ``'gradflow[transformers]'``).
"""
