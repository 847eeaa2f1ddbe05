"""Data in the forms users have: numpy arrays, pandas Series/DataFrames and lists of numbers become tensors once,
with the same fit as tensor data (bit for bit); what cannot be numbers is a ModelError naming the entry; a
float64 data set fitted in float32 says that its values round."""
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import bbvi
from torch.distributions import Normal

X = np.array([[0.3, -1.2], [1.1, 0.4], [-0.7, 0.9], [2.0, -0.1], [0.25, 0.5]])
Y = np.array([1, 0, 1, 1, 0])


def _log_joint(z, d):
    w = z["w"]
    logits = d["X"] @ w.T                                           # (N, S)
    return (torch.distributions.Normal(0.0, 1.0).log_prob(w).sum(-1)
            + torch.distributions.Bernoulli(logits=logits.T).log_prob(d["y"].to(w.dtype)).sum(-1))


def _fit(data):
    model = bbvi.Model(_log_joint, {"w": bbvi.Latent(shape=(2,))}, data=data, name="logreg")
    return bbvi.fit(model, steps=30, seed=0, diagnose=False)


def test_numpy_pandas_and_lists_fit_exactly_as_tensors():
    want = _fit({"X": torch.tensor(X), "y": torch.tensor(Y)})
    frame = pd.DataFrame(X, columns=["a", "b"])
    for data in ({"X": X, "y": Y}, {"X": frame, "y": pd.Series(Y)}, {"X": X.tolist(), "y": Y.tolist()},
                 {"X": [list(r) for r in X], "y": tuple(int(v) for v in Y)}):
        got = _fit(data)
        assert torch.equal(got.params["continuous"]["loc"], want.params["continuous"]["loc"]), data
    model = bbvi.Model(_log_joint, {"w": bbvi.Latent(shape=(2,))}, data={"X": X, "y": Y})
    assert model.data["X"].dtype == torch.float64 and model.data["y"].dtype == torch.int64
    assert bbvi.Model(_log_joint, {"w": bbvi.Latent()}, data=[True, False]).data.dtype == torch.bool
    nested = bbvi.Model(_log_joint, {"w": bbvi.Latent()}, data={"n": 3, "parts": [torch.ones(2), np.zeros(3)]}).data
    assert nested["n"] == 3 and torch.is_tensor(nested["parts"][1])          # plain ints stay ints


def test_data_that_cannot_be_numbers_is_named():
    lat = {"w": bbvi.Latent()}
    with pytest.raises(bbvi.ModelError, match=r"data\['g'\].*'colour'.*\.cat\.codes"):
        bbvi.Model(_log_joint, lat, data={"g": pd.DataFrame({"x": [1.0, 2.0], "colour": ["red", "blue"]})})
    with pytest.raises(bbvi.ModelError, match=r"data\['s'\] is a numpy array of dtype <U"):
        bbvi.Model(_log_joint, lat, data={"s": np.array(["a", "b"])})
    with pytest.raises(bbvi.ModelError, match="complex"):
        bbvi.Model(_log_joint, lat, data=np.array([1 + 2j]))
    with pytest.raises(bbvi.ModelError, match="not rectangular"):
        bbvi.Model(_log_joint, lat, data=[[1.0, 2.0], [3.0]])
    frame = bbvi.Model(_log_joint, lat, data=pd.Series([1.0, None, 3.0])).data   # missing values: NaN
    assert torch.isnan(frame[1]) and frame.dtype == torch.float64


def test_float64_data_in_a_float32_fit_says_it_rounds():
    data = {"X": X + 1e-9, "y": Y}
    model = bbvi.Model(_log_joint, {"w": bbvi.Latent(shape=(2,))}, data=data, name="logreg")
    with pytest.warns(UserWarning, match=r"data\['X'\] is float64 and the fit runs in float32: 10 of 10 values round"):
        bbvi.fit(model, steps=2, dtype=torch.float32, diagnose=False)
    exact = bbvi.Model(_log_joint, {"w": bbvi.Latent(shape=(2,))}, data={"X": np.array([[0.5, 1.0]]), "y": Y[:1]})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        bbvi.fit(exact, steps=2, dtype=torch.float32, diagnose=False)   # exactly representable: no note


def test_pandas_objects_with_different_indexes_are_refused():
    """Reliability III, 3: two Series whose indexes were in different orders were paired by position, and the fit
    gave b = 1.03 +- 0.008 where the aligned data say 2. Now the Model refuses them and says how to align; equal
    indexes, and pandas objects of different lengths (different plates), are accepted."""
    x = pd.Series(np.arange(6.0), index=list("abcdef"))
    y = pd.Series(2 * np.arange(6.0), index=list("abcdef"))
    shuffled = y.sample(frac=1.0, random_state=0)

    def log_joint(z, d):
        return Normal(z["b"][:, None] * d["x"], 1.0).log_prob(d["y"]).sum(-1)
    with pytest.raises(bbvi.ModelError, match=r"data\['x'\] and data\['y'\].*same labels in another order.*reindex"):
        bbvi.Model(log_joint, {"b": bbvi.Latent()}, data={"x": x, "y": shuffled})
    model = bbvi.Model(log_joint, {"b": bbvi.Latent()}, data={"x": x, "y": shuffled.reindex(x.index)})
    assert torch.equal(model.data["y"], torch.as_tensor(2 * np.arange(6.0)))
    bbvi.Model(log_joint, {"b": bbvi.Latent()}, data={"x": x, "y": y, "groups": pd.Series([1.0, 2.0])})


def test_missing_integers_and_long_doubles_are_named():
    """Reliability III, A3 and A4: a nullable Int64 (or boolean) column with pd.NA became float64 NaN, so a
    log-joint indexing with it failed inside torch ('tensors used as indices must be long'), naming neither the
    data nor the missing value; numpy float128 data was torch's raw TypeError. Both are now a ModelError naming the
    entry, the dtype and (for pd.NA) the rows; float NaN and Int64 without missing values are kept as they were."""
    lat = {"w": bbvi.Latent()}
    with pytest.raises(bbvi.ModelError, match=r"data\['g'\]: pandas Series of dtype Int64 holds missing values "
                                              r"\(pd.NA\) at rows \[2\].*\.dropna\(\)"):
        bbvi.Model(_log_joint, lat, data={"g": pd.Series([0, 1, pd.NA, 1], dtype="Int64"), "y": pd.Series(Y[:4])})
    frame = pd.DataFrame({"a": [1.0, 2.0], "b": pd.array([True, None], dtype="boolean")})
    with pytest.raises(bbvi.ModelError, match=r"data: pandas column\(s\) \['b'\] of dtype boolean hold missing "
                                              r"values \(pd.NA\) at rows \{'b': \[1\]\}"):
        bbvi.Model(_log_joint, lat, data=frame)
    assert bbvi.Model(_log_joint, lat, data=pd.Series([0, 1], dtype="Int64")).data.dtype == torch.int64
    assert torch.isnan(bbvi.Model(_log_joint, lat, data=pd.Series([1.5, pd.NA], dtype="Float64")).data[1])
    with pytest.raises(bbvi.ModelError, match=r"data\['x'\] is a numpy array of dtype float128 \(long double\).*"
                                              r"astype\(np.float64\)"):
        bbvi.Model(_log_joint, lat, data={"x": np.array([1.0, 2.0], dtype=np.longdouble)})
    with pytest.raises(bbvi.ModelError, match="numpy scalar of dtype float128"):
        bbvi.Model(_log_joint, lat, data=np.longdouble(3.0))
    with pytest.raises(bbvi.ModelError, match="pandas Series of dtype float128"):
        bbvi.Model(_log_joint, lat, data=pd.Series([1.0, 2.0], dtype=np.longdouble))
