"""
The ``twistd eventsource`` drop-in.

Only a name and a module path: ``eventsource.tap`` is imported when twistd
actually needs the options or the service, not when it lists its plugins.
"""

from twisted.application.service import ServiceMaker

EventSource = ServiceMaker(
    "eventsource",
    "eventsource.tap",
    "An event store served over Redis pub/sub, kept in MariaDB/MySQL.",
    "eventsource",
)
