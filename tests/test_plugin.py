"""
Tests for the C{twistd eventsource} drop-in, L{twisted.plugins.eventsource_plugin}.

A drop-in that fails to import makes C{twistd --help} print a traceback and
still exit 0, then C{twistd eventsource} says "Unknown command": so the
import itself is tested here.
"""

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin, getPlugins
from twisted.plugins import eventsource_plugin
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from eventsource import tap


class PluginTests(SynchronousTestCase):
    """The drop-in is a lazy L{IServiceMaker} for L{eventsource.tap}."""

    def test_interfaces(self):
        """It provides L{IPlugin} and L{IServiceMaker}."""
        self.assertTrue(verifyObject(IPlugin, eventsource_plugin.EventSource))
        self.assertTrue(verifyObject(IServiceMaker, eventsource_plugin.EventSource))

    def test_tapname(self):
        """twistd knows it as C{eventsource}."""
        self.assertEqual(eventsource_plugin.EventSource.tapname, "eventsource")

    def test_points_at_tap(self):
        """Its options and service come from L{eventsource.tap}."""
        self.assertIs(eventsource_plugin.EventSource.options, tap.Options)
        self.assertIs(eventsource_plugin.EventSource.makeService, tap.makeService)

    def test_found(self):
        """Twisted's plugin discovery finds it, as twistd does."""
        found = [p for p in getPlugins(IServiceMaker) if p.tapname == "eventsource"]
        self.assertEqual(found, [eventsource_plugin.EventSource])
