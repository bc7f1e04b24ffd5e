"""A plug-in module that fails while importing (tests/broken/)."""

raise RuntimeError("needs a licence server")
