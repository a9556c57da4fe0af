"""Plug-ins that put pyopd's fused losses inside other training frameworks.

Each plug-in is its own module and imports its framework on import, so import
the one you use directly (for example ``pyopd.integrations.trl``); this
package imports none of them.
"""
