"""The storage contract of ``tests/search/test_storage_contract.py`` on PostgreSQL: ``open_storage`` of
a server URL (retries, the trial cache), each call a new storage object on one database."""
from __future__ import annotations

import itertools

import pytest

from p3b_search.search.optuna_storage import open_storage
from tests.search.test_storage_contract import (  # noqa: F401  (collected here, on PostgreSQL)
    test_a_finished_trial_refuses_writes,
    test_a_second_study_of_the_same_name_is_refused_and_a_deleted_one_is_gone,
    test_a_study_reads_back_as_written_from_another_storage_object,
    test_what_one_storage_object_writes_the_other_reads_next,
)

pytestmark = pytest.mark.cluster
_DATABASES = itertools.count()


@pytest.fixture
def storages(postgres):
    url = postgres.create_database(f"contract{next(_DATABASES)}")
    return lambda: open_storage(url)
