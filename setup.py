"""
Packaging for eventsource.

``twisted.plugins`` is listed by hand: it has no ``__init__.py`` (and must
never get one), so ``find_packages`` cannot see it, but the wheel has to carry
``twisted/plugins/eventsource_plugin.py`` for ``twistd eventsource`` to work.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (HERE / "eventsource" / "__init__.py").read_text(), re.M
).group(1)

setup(
    name="eventsource",
    version=VERSION,
    description="An event store server on Twisted, over Redis pub/sub and MariaDB/MySQL.",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["eventsource", "eventsource.*"]) + ["twisted.plugins"],
    # the page the HTTP port serves at / (eventsource.page): read from the
    # installed package, so the wheel (and the sdist it is built from) carries them
    package_data={"eventsource": ["static/index.html", "static/page.js", "static/page.css"]},
    python_requires=">=3.10",
    install_requires=[
        "twisted>=23.10",
        "txredisapi>=1.6.0",
        "hiredis>=2.0",
        "pymysql>=1.0.2",
        "transitions>=0.9.0",
        # /metrics: the exposition formats (text and OpenMetrics) and the
        # process collector; eventsource.metrics, eventsource.http
        "prometheus-client>=0.17",
    ],
    extras_require={"test": ["hypothesis>=6.0"]},
    entry_points={"console_scripts": ["eventsource = eventsource.cli:main"]},
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
    ],
)
