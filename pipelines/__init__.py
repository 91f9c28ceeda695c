"""The image lifecycle, one module per stage (data, prepare, train, submit, classifier, evaluate, export,
registry), each a thin CLI over pure functions; ``common`` holds the plumbing several stages share and
``text`` the text-conditioned decoding track. ``cli`` is the ``latentforge`` command.
"""
