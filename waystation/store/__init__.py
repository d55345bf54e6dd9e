"""Where runs land: the Store protocol, the SQLite store and the payload codec."""
