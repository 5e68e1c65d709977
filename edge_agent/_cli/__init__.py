"""The ``edge-agent`` command's parts (``edge_agent.cli`` is the entry point and builds the
parser from them). One module per command group, each with its handlers (``cmd_*``) and the
function that adds its sub-commands to the parser:

- ``common``: the configuration a command runs with, the model store, the daemon client, and
  the option sets several commands share (``add_model_options``, ``add_client_options``)
- ``models``: ``models prepare-default|list|import|pull|verify``
- ``serving``: ``serve``, ``probe``, ``tune``, ``embed`` (the engine on this host)
- ``documents``: ``add``, ``search`` (with ``--fleet``), ``delete``, ``collections``
- ``operations``: ``index check|repair``, ``stats``, ``health``, ``token``, ``discover``,
  ``config show|path|init``, ``service install|uninstall``

Nothing outside ``edge_agent.cli`` imports this package (an import-linter contract).
"""
