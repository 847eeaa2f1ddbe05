"""The data as the log-joint sees it: `as_tensors` turns numpy arrays, numbers, pandas Series and DataFrames, and
nested dicts, lists and tuples of them into tensors (float64 where a number is a float); `precision_notes` says
what a lower dtype would round; `_move` puts the data on a device and dtype."""
import torch

from .errors import ModelError


def as_tensors(obj, where="data"):
    """The data as the log-joint will see it: numpy arrays and scalars, pandas Series and DataFrames (numeric), and
    lists/tuples of plain numbers become tensors, once (float64 stays float64 until the fit casts it to its dtype;
    integers stay int64, booleans bool); dicts, lists and tuples of other things are walked; anything else is passed
    as it is (a Python int stays an int). Data that cannot be numbers (strings, objects, complex), numpy long
    doubles (float128, which torch has no dtype for) and pandas nullable integers or booleans with pd.NA are a
    ModelError naming the entry (float NaN is passed as it is)."""
    if torch.is_tensor(obj) or obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    module = type(obj).__module__.split(".")[0]
    if module == "pandas" and hasattr(obj, "to_numpy"):
        return _from_pandas(obj, where)
    if module == "numpy":
        import numpy as np
        arr = np.asarray(obj)
        if arr.dtype.kind not in "biuf":
            raise ModelError(f"{where} is a numpy {'array' if arr.ndim else 'scalar'} of dtype {arr.dtype}, which "
                             f"bbvi cannot pass to torch as numbers" + (": complex data is not supported"
                                                                         if arr.dtype.kind == "c" else ""))
        if arr.dtype.kind == "f" and arr.dtype.itemsize > 8:
            raise ModelError(_LONGDOUBLE.format(where=where, dtype=arr.dtype, what="numpy " + (
                "array" if arr.ndim else "scalar") + " of", convert=".astype(np.float64)"))
        return torch.as_tensor(arr.astype(np.int64) if arr.dtype.kind in "iu" else arr.copy())
    if isinstance(obj, dict):
        _check_pandas_aligned(obj, where)
        return type(obj)((k, as_tensors(v, f"{where}[{k!r}]")) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        if obj and _all_numbers(obj):
            try:
                return torch.tensor(obj, dtype=torch.float64 if _any_float(obj) else None)
            except (ValueError, TypeError) as e:  # ragged nesting
                raise ModelError(f"{where} is a nested list of numbers that is not rectangular ({e}); pass a "
                                 f"tensor or an array") from None
        return type(obj)(as_tensors(v, f"{where}[{i}]") for i, v in enumerate(obj))
    return obj


def _check_pandas_aligned(obj, where):
    """ModelError where two pandas Series/DataFrames of the same length in one dict have different indexes: bbvi
    takes their rows by position, so rows of different labels would be paired (seen: two Series in different orders
    gave a slope of 1.03 where the aligned data say 2)."""
    frames = [(k, v) for k, v in obj.items()
              if type(v).__module__.split(".")[0] == "pandas" and hasattr(v, "index") and hasattr(v, "to_numpy")]
    for i, (k1, a) in enumerate(frames):
        for k2, b in frames[i + 1:]:
            if len(a) == len(b) and not a.index.equals(b.index):
                same = set(a.index) == set(b.index)
                raise ModelError(
                    f"{where}[{k1!r}] and {where}[{k2!r}] are pandas objects of {len(a)} rows with different indexes"
                    + (" (the same labels in another order)" if same else "") + ": bbvi pairs rows by position, "
                    f"not by label. Align them first ({where}[{k2!r}].reindex({where}[{k1!r}].index)) or, where "
                    f"positions are meant, drop the indexes (.reset_index(drop=True) on both)")


def _all_numbers(obj):
    if isinstance(obj, (list, tuple)):
        return all(_all_numbers(v) for v in obj)
    return isinstance(obj, (bool, int, float)) or type(obj).__module__ == "numpy" and getattr(obj, "ndim", 1) == 0


def _any_float(obj):
    if isinstance(obj, (list, tuple)):
        return any(_any_float(v) for v in obj)
    return isinstance(obj, float) or getattr(getattr(obj, "dtype", None), "kind", "") == "f"


def _from_pandas(obj, where):
    import numpy as np
    from pandas.api.types import is_bool_dtype, is_float_dtype, is_numeric_dtype
    frame = obj.to_frame() if obj.ndim == 1 else obj
    bad = [(c, frame[c].dtype) for c in frame.columns if not is_numeric_dtype(frame[c])]
    if bad:
        raise ModelError(f"{where}: pandas column(s) {[str(c) for c, _ in bad]} have dtype(s) {[str(d) for _, d in bad]}, "
                         f"not numbers; convert them first (a categorical: .cat.codes; text: a mapping to numbers) "
                         f"or pass only the numeric columns")
    def named(cols):
        return "pandas Series" if obj.ndim == 1 else f"pandas column(s) {[str(c) for c in cols]}"
    wide = [c for c in frame.columns if is_float_dtype(frame[c]) and getattr(frame[c].dtype, "itemsize", 8) > 8]
    if wide:
        raise ModelError(_LONGDOUBLE.format(where=where, what=named(wide) + " of", dtype=frame[wide[0]].dtype,
                                            convert=".astype('float64')"))
    missing = [c for c in frame.columns if not is_float_dtype(frame[c]) and bool(frame[c].isna().any())]
    if missing:   # a nullable Int64 / boolean column with pd.NA: as floats (NaN) it would no longer count or index
        rows = [frame.index[frame[c].isna()].tolist() for c in missing]
        rows = [r[:5] + (["..."] if len(r) > 5 else []) for r in rows]
        raise ModelError(f"{where}: {named(missing)} of dtype {', '.join(str(frame[c].dtype) for c in missing)} "
                         f"hold{'s' if obj.ndim == 1 else ''} missing values (pd.NA) at rows "
                         f"{rows[0] if obj.ndim == 1 else dict(zip(map(str, missing), rows))}; torch has no missing "
                         f"integer or boolean, and as float NaN they would no longer index or count. Drop those "
                         f"rows (.dropna()), fill them (.fillna(value)), or convert to floats yourself "
                         f"(.astype('float64'): NaN) if the log-joint handles NaN")
    if any(is_float_dtype(frame[c]) for c in frame.columns):
        arr = obj.to_numpy(dtype=np.float64, na_value=np.nan)
    elif all(is_bool_dtype(frame[c]) for c in frame.columns):
        arr = obj.to_numpy(dtype=bool)
    else:
        arr = obj.to_numpy(dtype=np.int64)
    return torch.as_tensor(arr.copy())


_LONGDOUBLE = ("{where} is a {what} dtype {dtype} (long double), which torch has no dtype for; convert it to "
               "float64 first ({convert}: values beyond float64's 16 digits round)")


def precision_notes(obj, dtype, where="data"):
    """For a fit in `dtype` (float32): a text for every float64 data tensor whose values round when cast."""
    if torch.is_tensor(obj):
        if obj.dtype == torch.float64 and dtype == torch.float32:
            back = obj.to(torch.float32).to(torch.float64)
            changed = (back != obj) & torch.isfinite(obj)
            if bool(changed.any()):
                rel = ((back - obj).abs() / obj.abs().clamp_min(torch.finfo(torch.float64).tiny))[changed].max()
                return [f"{where} is float64 and the fit runs in float32: {int(changed.sum())} of {obj.numel()} "
                        f"values round (largest relative change {rel.item():.2g})"]
        return []
    if isinstance(obj, dict):
        return [n for k, v in obj.items() for n in precision_notes(v, dtype, f"{where}[{k!r}]")]
    if isinstance(obj, (list, tuple)):
        return [n for i, v in enumerate(obj) for n in precision_notes(v, dtype, f"{where}[{i}]")]
    return []


def _move(obj, device, dtype):
    if torch.is_tensor(obj):
        return obj.to(device=device, dtype=dtype if obj.is_floating_point() and dtype is not None else None)
    if isinstance(obj, dict):
        return type(obj)((k, _move(v, device, dtype)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_move(v, device, dtype) for v in obj)
    return obj
