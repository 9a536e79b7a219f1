"""Admission control's budgets (`core/admission.py`): the server's bytes of requests in flight
and a model's estimated memory, without a server."""

from __future__ import annotations

import pytest

from inferd.core.admission import ByteBudget, RequestMemory
from inferd.core.errors import QueueFull


def test_byte_budget_refuses_what_would_exceed_it_and_takes_it_back_on_release() -> None:
    budget = ByteBudget(100)
    budget.acquire(60)
    with pytest.raises(QueueFull, match="max_request_bytes_in_flight"):
        budget.acquire(50)
    assert (budget.in_use, budget.refused) == (60, 1)
    budget.release(60)
    budget.acquire(50)
    assert budget.in_use == 50


def test_a_lone_request_larger_than_the_budget_is_let_in_on_an_idle_server() -> None:
    budget = ByteBudget(100)
    budget.acquire(1000)
    with pytest.raises(QueueFull):
        budget.acquire(1)
    budget.release(1000)
    assert budget.in_use == 0


def test_no_request_memory_unless_configured() -> None:
    assert RequestMemory.configured("m", 1.0, 0) is None
    assert RequestMemory.configured("m", 2.0, 0) is not None
    assert RequestMemory.configured("m", 1.0, 10) is not None


def test_request_memory_charges_the_estimate_to_the_model_and_the_excess_to_the_server() -> None:
    server = ByteBudget(10_000)
    memory = RequestMemory("m", 4.0, 1_000)
    charged = memory.acquire(200, server)  # estimate 800: 800 to the model, 600 to the server
    assert charged == (800, 600) and server.in_use == 600
    with pytest.raises(QueueFull, match=r"model 'm'.*max_request_bytes_in_flight of 1000"):
        memory.acquire(100, server)  # 400 more would make 1200
    assert server.in_use == 600, "a refused request holds nothing"
    memory.release(charged, server)
    assert server.in_use == 0
    assert memory.acquire(250, server) == (1000, 750)


def test_a_server_budget_refusal_releases_the_models_charge() -> None:
    server = ByteBudget(1_000)
    server.acquire(900)
    memory = RequestMemory("m", 3.0, 10_000)
    with pytest.raises(QueueFull):
        memory.acquire(100, server)  # 200 beyond the message: the server has 100 left
    assert memory.acquire(10, server) == (30, 20)


def test_a_models_estimate_beyond_the_whole_budget_is_let_in_on_an_idle_server() -> None:
    server = ByteBudget(1_000)
    server.acquire(400)  # the request's own message, charged on arrival
    memory = RequestMemory("m", 20.0, 0)
    assert memory.acquire(400, server) == (0, 7_600)
    with pytest.raises(QueueFull):
        server.acquire(1)
