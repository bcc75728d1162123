"""
eventsource: an event store server on Twisted.

Clients talk to it over Redis pub/sub (persist, fetch, fetch-next); the
events live in a MariaDB/MySQL table.  ``twistd eventsource`` runs it.
"""

__version__ = "0.1.0"
