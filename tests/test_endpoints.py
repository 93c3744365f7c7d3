"""Several endpoints behind one LLM: parsing, routing and choosing the server.

The traffic itself is tested against two real vLLM servers in test_vllm.py.
"""

import time

import pytest

from tpo_data.endpoints import (BalancedOpenAILLM, BalancingTransport, FinishReasonOpenAILLM, openai_http,
                                split_endpoints)
from tpo_data.engines import EngineArguments, SamplingArguments, build_llm
from tpo_data.errors import TPODataError
from tpo_data.judges import JudgeArguments

A, B, C = "http://10.0.0.1:8000/v1", "http://10.0.0.2:8000/v1", "https://gpu-3.example/serve/v1"


def test_split_endpoints():
    assert split_endpoints(f" {A}/ ,{B}") == [A, B]
    assert split_endpoints(A) == [A]
    with pytest.raises(TPODataError, match="'10.0.0.2:8000/v1'") as err:
        split_endpoints(f"{A},10.0.0.2:8000/v1")
    assert "several separated by commas" in err.value.fix
    with pytest.raises(TPODataError, match="same endpoint twice"):
        split_endpoints(f"{A},{A}/")
    with pytest.raises(TPODataError, match="not an http"):
        split_endpoints(f"{A},")


def test_bad_endpoint_lists_fail_at_parse_time_naming_the_flag():
    with pytest.raises(TPODataError, match="--base_url"):
        EngineArguments(engine="openai", base_url=f"{A},{A}")
    with pytest.raises(TPODataError, match="--judge_base_url"):
        JudgeArguments(judge="pairwise", judge_base_url=f"{A},localhost:9")


def test_route_moves_path_and_query_under_the_chosen_endpoint():
    http = openai_http()
    t = BalancingTransport([A, C], http=http)
    url = http.URL(f"{A}/chat/completions?api-version=1")
    assert str(t.route(url, 0)) == f"{A}/chat/completions?api-version=1"
    assert str(t.route(url, 1)) == f"{C}/chat/completions?api-version=1"
    with pytest.raises(ValueError, match="not under"):
        t.route(http.URL("http://10.0.0.1:8000/other/models"), 1)


def test_pick_least_busy_then_least_used_and_skip_servers_that_are_down():
    t = BalancingTransport([A, B, C])
    assert t.pick() == 0
    t.open, t.sent = [1, 0, 0], [1, 0, 0]
    assert t.pick() == 1  # idle beats busy
    t.open, t.sent = [0, 0, 0], [3, 1, 2]
    assert t.pick() == 1  # all idle: the least used, so sequential requests alternate
    t.open = [2, 0, 5]
    t.down_until = [0.0, time.monotonic() + 60, 0.0]
    assert t.pick() == 0  # the idle one is down
    t.down_until = [time.monotonic() + 60] * 3
    assert t.pick() == 1  # all down: try the least busy anyway rather than fail without asking


def test_build_llm_balances_only_several_endpoints():
    sampling = SamplingArguments()
    one = build_llm(EngineArguments(engine="openai", base_url=A), sampling, "m", A, "m")
    assert type(one) is FinishReasonOpenAILLM and one.base_url == A
    both = f"{A},{B}"
    llm = build_llm(EngineArguments(engine="openai", base_url=both), sampling, "m", both, "m")
    assert isinstance(llm, BalancedOpenAILLM) and llm.base_urls == [A, B] and llm.base_url == A
    dumped = llm.dump()
    assert dumped["base_urls"] == [A, B] and "api_key" not in dumped
