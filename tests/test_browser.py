"""The live page in a real browser: Debian's chromium, driven by Selenium through the system's
chromedriver (no driver or browser download), headless, against `search.py --serve` on 127.0.0.1.
It loads the page, types a query, sees the first result the API gives, opens a heat map (its
pictures load only then) and uploads a photo. Skips, saying why, only where no browser is installed
(.ci/run installs chromium and chromium-driver)."""
import os
import shutil
import tempfile
import time
import urllib.parse

import pytest

from test_server import photos, world  # noqa: F401 (the fixtures: one server each)

CHROMIUM, DRIVER = shutil.which('chromium') or '/usr/bin/chromium', shutil.which('chromedriver') or '/usr/bin/chromedriver'
FLAGS = ('--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync',
         '--disable-dev-shm-usage')


@pytest.fixture(scope='module')
def browser():
    """A headless chromium with a fresh profile, or a skip naming what is missing."""
    webdriver = pytest.importorskip('selenium.webdriver', reason='selenium is not installed (./install.sh selenium)')
    for path, package in ((CHROMIUM, 'chromium'), (DRIVER, 'chromium-driver')):
        if not os.access(path, os.X_OK):
            pytest.skip(f'no {path}: install Debian\'s {package} (apt-get install chromium chromium-driver)')
    profile = tempfile.mkdtemp(prefix='casc-chromium-')
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + (f'--user-data-dir={profile}',):
        options.add_argument(flag)
    from selenium.webdriver.chrome.service import Service
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))  # no Selenium Manager
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait_for(condition, seconds: float = 60):
    """condition() until it is truthy (bounded) -> its value."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f'not within {seconds} s')


def loaded(img) -> bool:
    return img.get_property('complete') and (img.get_property('naturalWidth') or 0) > 0


def test_type_a_query_see_the_first_result_open_a_heat_map(browser, world):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    srv = world[3]
    browser.get(srv.url)
    box = browser.find_element(By.NAME, 'q')
    box.send_keys('a red dog', Keys.ENTER)
    wait_for(lambda: '?q=' in browser.current_url and browser.find_elements(By.CSS_SELECTOR, 'li.result'))
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(browser.current_url).query)['q'] == ['a red dog']
    expected = srv.get('/api/search?q=a+red+dog&k=10')[1]['results'][0]['index']
    first = browser.find_elements(By.CSS_SELECTOR, 'li.result')[0]
    thumb = first.find_element(By.CSS_SELECTOR, 'img.thumb')
    assert thumb.get_attribute('src').endswith(f'/thumbs/{expected}.jpg')
    assert first.find_element(By.CSS_SELECTOR, '.image').text == f'image {expected}'
    wait_for(lambda: loaded(thumb))
    details = first.find_element(By.CSS_SELECTOR, 'details.attention')
    maps = details.find_elements(By.CSS_SELECTOR, 'figure img')
    assert [f.text for f in details.find_elements(By.TAG_NAME, 'figcaption')] == ['', '', '']  # hidden: closed
    details.find_element(By.TAG_NAME, 'summary').click()
    wait_for(lambda: all(loaded(m) for m in maps))
    assert [f.text for f in details.find_elements(By.TAG_NAME, 'figcaption')] == ['a', 'red', 'dog']
    assert browser.find_element(By.NAME, 'q').get_attribute('value') == 'a red dog'  # the box keeps the query


def test_upload_a_photo_and_see_its_captions(browser, photos):  # noqa: F811
    from selenium.webdriver.common.by import By
    root, names, srv = photos
    path = str(root / 'photos' / names[3])
    with open(path, 'rb') as f:
        expected = srv.upload(f.read())[1]['results'][0]['caption']
    browser.get(srv.url)
    browser.find_element(By.CSS_SELECTOR, 'input[type=file][name=image]').send_keys(path)
    browser.find_element(By.CSS_SELECTOR, 'form.upload button').click()
    section = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, 'section.image-query'))[0]
    assert section.find_element(By.TAG_NAME, 'h3').text == 'Your photo'
    assert section.find_elements(By.CSS_SELECTOR, 'li.result .caption')[0].text == expected
    wait_for(lambda: loaded(section.find_element(By.CSS_SELECTOR, 'img.thumb')))
