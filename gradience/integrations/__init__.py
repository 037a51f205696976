"""Framework integrations: thin adapters that translate a framework's training events into controller calls.

Each submodule imports its framework itself (``hf`` imports transformers), so importing this package needs
nothing beyond the core. Integrations hold no policy; every decision is made by
:class:`~gradience.controller.GradienceController`.
"""
