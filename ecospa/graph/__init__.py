"""Graph side of ecospa: capture, channel flow, and coupling discovery."""
