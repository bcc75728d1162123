"""
The service tree and its declared boundaries: the store and the bus are
child services (started in that order, stopped in reverse), every knob is a
constructor argument, and the real boundaries and their in-memory doubles
all provide the interfaces the service relies on.
"""

import json
import signal

from twisted.application.service import IService
from twisted.internet import defer
from twisted.internet.interfaces import IReactorCore
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyClass, verifyObject

from eventsource import schema
from eventsource.bus import RedisBus
from eventsource.config import Config
from eventsource.interfaces import IEventBus, IEventStore, IPager
from eventsource.query import TableSchema, compile_insert, compile_select
from eventsource.service import EventSourceService, make_server
from eventsource.store import Pager, Store
from eventsource.testing import MemoryBus, MemoryStore


class InterfaceTests(SynchronousTestCase):
    """The real classes and the doubles pass the same verification."""

    def test_buses(self):
        for bus in (RedisBus(Config(), Clock(), lambda channel, body: None), MemoryBus()):
            self.assertTrue(verifyObject(IEventBus, bus), bus)
            self.assertTrue(verifyClass(IEventBus, type(bus)), bus)

    def test_stores_and_their_pagers(self):
        plan = compile_select({}, TableSchema("es", "event"))
        for store in (Store(Config(), Clock()), MemoryStore()):
            self.assertTrue(verifyObject(IEventStore, store), store)
            self.assertTrue(verifyObject(IPager, store.pager(plan)), store)
        self.assertTrue(verifyClass(IPager, Pager))

    def test_the_real_server_is_built_on_the_real_boundaries(self):
        server = make_server(Config(), Clock())
        self.assertIsInstance(server.bus, RedisBus)
        self.assertIsInstance(server.store, Store)
        self.assertTrue(verifyObject(IService, server))


class MemoryStoreSchemaTests(SynchronousTestCase):
    """The double stores and pages the table's columns, as schema.py defines them."""

    def test_events_are_rows_of_the_table(self):
        store = MemoryStore()
        store.insert(compile_insert({"$documents": {"pid": "p", "domain": "d", "name": "n",
                                                    "data": {"a": 1}}},
                                    TableSchema("es", "event")))
        (event,) = store.events
        row = dict(zip(schema.COLUMN_NAMES, event))
        self.assertEqual((row["id"], row["pid"], row["domain"], row["name"], row["data"]),
                         (1, "p", "d", "n", '{"a":1}'))
        high_water, (body,), last, cut = self.successResultOf(store.read_page(
            compile_select({}, TableSchema("es", "event")), None, 0, 10))
        self.assertEqual(list(json.loads(body)), list(schema.DEFAULT_COLUMNS))


class RecordingStore(MemoryStore):
    """A store whose start and stop wait for the test, and say when they were called."""

    def __init__(self, calls):
        super().__init__()
        self.calls = calls
        self.starting = defer.Deferred()
        self.stopping = defer.Deferred()

    def start(self):
        self.calls.append("store.start")
        return self.starting

    def stop(self):
        self.calls.append("store.stop")
        return self.stopping


class RecordingBus(MemoryBus):
    def __init__(self, calls):
        super().__init__()
        self.calls = calls
        self.stopping = defer.Deferred()

    def start(self):
        self.calls.append("bus.start")
        return super().start()

    def stop(self):
        self.calls.append("bus.stop")
        return self.stopping


@implementer(IReactorCore)
class FakeReactor(Clock):
    """A running reactor's clock that records being stopped, with twistd's exit signal."""

    running = True
    _exitSignal = None

    def __init__(self):
        super().__init__()
        self.stopped = 0

    def stop(self):
        self.stopped += 1


class TreeTests(SynchronousTestCase):
    def make(self, reactor=None, **kwargs):
        self.calls = []
        self.store = RecordingStore(self.calls)
        self.bus = RecordingBus(self.calls)
        self.service = EventSourceService(Config(), reactor or Clock(), store=self.store,
                                          bus=self.bus.attach, **kwargs)
        return self.service

    def test_the_store_and_the_bus_are_child_services(self):
        service = self.make()
        self.assertEqual([child.name for child in service], ["store", "bus"])
        self.assertIs(service.getServiceNamed("store").boundary, self.store)
        self.assertIs(service.getServiceNamed("bus").boundary, self.bus)
        service.startService()
        self.assertTrue(all(child.running for child in service))

    def test_the_bus_starts_once_the_table_is_ready(self):
        service = self.make()
        service.startService()
        self.assertEqual(self.calls, ["store.start"])
        self.assertNoResult(service.ready)
        self.store.starting.callback(["created table"])
        self.assertEqual(self.calls, ["store.start", "bus.start"])
        self.assertIs(self.successResultOf(service.ready), service)

    def test_stopped_in_reverse_order_one_after_the_other(self):
        service = self.make()
        service.startService()
        self.store.starting.callback([])
        d = service.stopService()
        self.assertEqual(self.calls[2:], ["bus.stop"])
        self.assertNoResult(d)
        self.bus.stopping.callback(None)
        self.assertEqual(self.calls[2:], ["bus.stop", "store.stop"])
        self.assertNoResult(d)
        self.store.stopping.callback(None)
        self.successResultOf(d)
        self.assertFalse(any(child.running for child in service))

    def test_messages_arrive_through_the_bus_it_built(self):
        service = self.make()
        service.startService()
        self.store.starting.callback([])
        self.bus.deliver("persist", json.dumps({"channel": "r", "query": {"$insert": {
            "$documents": {"pid": "p", "domain": "d", "name": "n"}}}}))
        self.assertEqual(self.bus.messages("r")[-1], "end")
        self.assertEqual(len(self.store.events), 1)

    def test_a_failed_start_stops_the_reactor(self):
        reactor = FakeReactor()
        service = self.make(reactor)
        service.startService()
        self.store.starting.errback(RuntimeError("no database"))
        self.failureResultOf(service.ready, RuntimeError)
        self.assertEqual(self.calls, ["store.start"])  # the bus never started
        self.assertEqual(reactor.stopped, 1)
        self.flushLoggedErrors(RuntimeError)

    def test_a_failed_start_leaves_the_reactor_alone_when_told_to(self):
        reactor = FakeReactor()
        service = self.make(reactor, stop_reactor_on_failure=False)
        service.startService()
        self.store.starting.errback(RuntimeError("no database"))
        self.failureResultOf(service.ready, RuntimeError)
        self.assertEqual(reactor.stopped, 0)
        self.flushLoggedErrors(RuntimeError)

    def test_a_clean_stop_after_sigterm_exits_0(self):
        reactor = FakeReactor()
        reactor._exitSignal = signal.SIGTERM
        service = self.make(reactor)
        service.startService()
        self.store.starting.callback([])
        d = service.stopService()
        self.assertEqual(reactor._exitSignal, signal.SIGTERM)  # (not yet: the stop is not done)
        self.bus.stopping.callback(None)
        self.store.stopping.callback(None)
        self.successResultOf(d)
        self.assertIsNone(reactor._exitSignal)

    def test_another_signal_is_kept(self):
        reactor = FakeReactor()
        reactor._exitSignal = signal.SIGINT
        service = self.make(reactor)
        service.startService()
        self.store.starting.callback([])
        self.bus.stopping.callback(None)
        self.store.stopping.callback(None)
        self.successResultOf(service.stopService())
        self.assertEqual(reactor._exitSignal, signal.SIGINT)


class SchemaSQLTests(SynchronousTestCase):
    """The SQL derived from the one table definition."""

    def test_create_table_has_every_column_and_index(self):
        database, table = schema.create_statements("es", "event")
        self.assertIn("utf8mb4_bin", database)
        for column in schema.COLUMNS:
            self.assertIn(f"`{column.name}` {column.sql_type}", table)
        for index in schema.INDEXES:
            self.assertIn(f"KEY `{index.name}` (" + ", ".join(
                f"`{c}`" for c in index.columns + ("id",)) + ")", table)
        self.assertIn("UNIQUE KEY `pid_version` (`pid`, `version`)", table)
        self.assertIn("UNIQUE KEY `event_id` (`event_id`)", table)

    def test_insert_writes_the_written_and_stream_columns(self):
        self.assertEqual(schema.insert_sql("`es`.`event`", 2),
                         "INSERT INTO `es`.`event` (`pid`, `domain`, `name`, `data`, `version`,"
                         " `event_id`) VALUES (%s, %s, %s, %s, %s, %s), (%s, %s, %s, %s, %s, %s)")

    def test_stream_columns_are_not_visible_to_version_1(self):
        self.assertEqual(schema.V1_COLUMN_NAMES,
                         ("id", "timestamp", "pid", "domain", "name", "data"))
        self.assertNotIn("version", schema.columns_of_kind(schema.NUMBER))

    def test_an_up_to_date_table_needs_nothing(self):
        columns = {name: (schema.COLLATION if name in schema.IDENTIFIER_COLUMNS else None)
                   for name in schema.COLUMN_NAMES}
        upgrade = schema.plan_upgrade(columns, [index.name for index in
                                                schema.INDEXES + schema.UNIQUE_KEYS])
        self.assertEqual(upgrade, schema.Upgrade())

    def test_a_table_of_an_earlier_release_gets_the_stream_columns(self):
        columns = {name: (schema.COLLATION if name in schema.IDENTIFIER_COLUMNS else None)
                   for name in schema.V1_COLUMN_NAMES}
        upgrade = schema.plan_upgrade(columns, [index.name for index in schema.INDEXES])
        self.assertEqual(upgrade.sql("es", "event"),
                         "ALTER TABLE `es`.`event` ADD COLUMN `version` BIGINT UNSIGNED NULL,"
                         " ADD COLUMN `event_id` BINARY(16) NULL,"
                         " ADD UNIQUE KEY `pid_version` (`pid`, `version`),"
                         " ADD UNIQUE KEY `event_id` (`event_id`)")
        self.assertTrue(upgrade.fill)
        self.assertEqual(schema.finish_sql("`es`.`event`"),
                         "ALTER TABLE `es`.`event` MODIFY `version` BIGINT UNSIGNED NOT NULL,"
                         " MODIFY `event_id` BINARY(16) NOT NULL")

    def test_a_fill_stopped_half_way_goes_on(self):
        columns = {name: (schema.COLLATION if name in schema.IDENTIFIER_COLUMNS else None)
                   for name in schema.COLUMN_NAMES}
        indexes = [index.name for index in schema.INDEXES + schema.UNIQUE_KEYS]
        upgrade = schema.plan_upgrade(columns, indexes, nullable=["data", "version", "event_id"])
        self.assertEqual((upgrade.alterations, upgrade.fill), ((), True))
        self.assertFalse(schema.plan_upgrade(columns, indexes, nullable=["data"]).fill)

    def test_the_original_table_is_upgraded(self):
        columns = {"timestamp": None, "pid": "utf8mb3_bin", "domain": "utf8mb3_bin",
                   "name": "utf8mb3_bin", "data": None}
        upgrade = schema.plan_upgrade(columns, [])
        self.assertEqual(upgrade.converted_from, ("utf8mb3_bin",))
        self.assertEqual(upgrade.changes[:2], ("converted to utf8mb4 (utf8mb4_bin)", "added id"))
        self.assertEqual(upgrade.changes[2:4], ("added version", "added event_id"))
        self.assertEqual(upgrade.changes[4:], tuple(f"added index {index.name}"
                                                    for index in schema.INDEXES + schema.UNIQUE_KEYS))
        self.assertTrue(upgrade.sql("es", "event").startswith(
            "ALTER TABLE `es`.`event` CONVERT TO CHARACTER SET utf8mb4 COLLATE utf8mb4_bin, "
            "ADD COLUMN `id` BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY FIRST, "
            "ADD COLUMN `version` BIGINT UNSIGNED NULL, ADD COLUMN `event_id` BINARY(16) NULL, "
            "ADD KEY `pid_id` (`pid`, `id`)"))

    def test_missing_columns_cannot_be_upgraded(self):
        with self.assertRaises(schema.MissingColumns) as caught:
            schema.plan_upgrade({"x": None}, [])
        self.assertEqual(caught.exception.args[0], ["data", "domain", "name", "pid", "timestamp"])
