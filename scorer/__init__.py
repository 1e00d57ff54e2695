"""The pool's shared state in Redis: settings, Lua scripts and their Python face."""
