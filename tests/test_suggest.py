from revsnn_triton.suggest import did_you_mean


def test_close_names_are_suggested_case_insensitively():
    assert did_you_mean("RevSResNet73", ["RevSResNet37", "MS-ResNet34"]) == " (did you mean 'RevSResNet37'?)"
    assert did_you_mean("revsresnet21", ["RevSResNet21"]) == " (did you mean 'RevSResNet21'?)"
    assert did_you_mean("cifar10", ["cifar10-dvs", "cifar100", "digits"]) == \
        " (did you mean 'cifar100' or 'cifar10-dvs'?)"


def test_nothing_close_or_not_a_string():
    assert did_you_mean("zzzz", ["RevSResNet37"]) == ""
    assert did_you_mean(3, ["a"]) == ""
    assert did_you_mean("a", []) == ""
