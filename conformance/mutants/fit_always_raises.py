"""Every fit crashes (an AttributeError in the train function): no check may pass on it."""


class Broken:
    def __init__(self, model, **options):
        self.model = model

    def __call__(self, *args):
        return self.model.no_such_attribute


def make_train_function(model, method="CG", maxiter=None, verbose=0, **options):
    return Broken(model, method=method, maxiter=maxiter, **options)
